/* ceiling_server: handlers/counter.py's protocol in C over epoll.
 *
 *   ceiling_server [--port PORT]      prints "listening on 127.0.0.1:PORT"
 *
 * Not a peer of mpxd but a yardstick: it answers lines about as fast as this
 * machine can, so the benchmark's figures against it show the load
 * generator's ceiling.  A Python server far below that figure is not being
 * held back by the load generator.
 *
 * Same answers as the Python counter: "N" adds N to the connection's counter,
 * "N global" to the shared one, anything not starting with a whole number
 * answers 0.  All answers to one read go out in one write; a client that does
 * not read has its input ignored until its output drains.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <arpa/inet.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <unistd.h>

#define MAX_LINE 65536
#define IN_SIZE 65536

typedef struct {
    long count;
    char *tail;          /* an unfinished line, up to MAX_LINE bytes */
    size_t tail_len;
    char *out;           /* output the kernel did not take yet */
    size_t out_len, out_off;
} conn;

static conn **conns;     /* indexed by fd */
static int nconns_max, ep;
static long global_count;

/* Append the counter's answer to one line (without its LF) to out. */
static size_t answer(conn *c, const char *line, size_t len, char *out) {
    if (len && line[len - 1] == '\r') len--;
    size_t i = 0;
    while (i < len && (line[i] == ' ' || line[i] == '\t')) i++;
    int sign = 1;
    if (i < len && (line[i] == '+' || line[i] == '-')) sign = line[i++] == '-' ? -1 : 1;
    size_t digits_at = i;
    long n = 0;
    while (i < len && line[i] >= '0' && line[i] <= '9') n = n * 10 + (line[i++] - '0');
    long value = 0;
    if (i > digits_at && (i == len || line[i] == ' ' || line[i] == '\t')) {
        n *= sign;
        while (i < len && (line[i] == ' ' || line[i] == '\t')) i++;
        size_t rest = len - i;
        while (rest && (line[i + rest - 1] == ' ' || line[i + rest - 1] == '\t')) rest--;
        if (rest == 6 && memcmp(line + i, "global", 6) == 0) {
            global_count += n;
            value = global_count;
        } else {
            c->count += n;
            value = c->count;
        }
    }
    return (size_t)sprintf(out, "%ld\n", value);
}

static void drop(int fd) {
    conn *c = conns[fd];
    free(c->tail);
    free(c->out);
    free(c);
    conns[fd] = NULL;
    close(fd);
}

static void set_events(int fd, uint32_t events) {
    struct epoll_event ev = {.events = events, .data.fd = fd};
    epoll_ctl(ep, EPOLL_CTL_MOD, fd, &ev);
}

/* Write pending output; returns -1 when the connection broke. */
static int flush_out(int fd, conn *c) {
    while (c->out_off < c->out_len) {
        ssize_t w = write(fd, c->out + c->out_off, c->out_len - c->out_off);
        if (w < 0) {
            if (errno == EAGAIN || errno == EINTR) {
                set_events(fd, EPOLLOUT);
                return 0;
            }
            return -1;
        }
        c->out_off += w;
    }
    free(c->out);
    c->out = NULL;
    c->out_len = c->out_off = 0;
    set_events(fd, EPOLLIN);
    return 0;
}

static int readable(int fd, conn *c) {
    static char in[IN_SIZE];
    static char out[IN_SIZE * 24];      /* at most 21 answer bytes per input byte */
    ssize_t r = read(fd, in, sizeof in);
    if (r < 0) return (errno == EAGAIN || errno == EINTR) ? 0 : -1;
    if (r == 0) return -1;
    size_t out_len = 0, start = 0;
    for (size_t i = 0; i < (size_t)r; i++) {
        if (in[i] != '\n') continue;
        if (c->tail_len) {
            size_t part = i - start;
            if (c->tail_len + part > MAX_LINE) return -1;
            memcpy(c->tail + c->tail_len, in + start, part);
            out_len += answer(c, c->tail, c->tail_len + part, out + out_len);
            c->tail_len = 0;
        } else {
            out_len += answer(c, in + start, i - start, out + out_len);
        }
        start = i + 1;
    }
    if (start < (size_t)r) {
        size_t part = r - start;
        if (c->tail_len + part > MAX_LINE) return -1;
        if (!c->tail) c->tail = malloc(MAX_LINE);
        memcpy(c->tail + c->tail_len, in + start, part);
        c->tail_len += part;
    }
    if (!out_len) return 0;
    ssize_t w = write(fd, out, out_len);
    if (w < 0) {
        if (errno != EAGAIN && errno != EINTR) return -1;
        w = 0;
    }
    if ((size_t)w < out_len) {
        c->out_len = out_len - w;
        c->out_off = 0;
        c->out = malloc(c->out_len);
        memcpy(c->out, out + w, c->out_len);
        set_events(fd, EPOLLOUT);
    }
    return 0;
}

int main(int argc, char **argv) {
    int port = 0;
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--port") == 0 && i + 1 < argc) port = atoi(argv[++i]);
        else { fprintf(stderr, "usage: ceiling_server [--port PORT]\n"); return 2; }
    }
    signal(SIGPIPE, SIG_IGN);
    struct rlimit rl;
    getrlimit(RLIMIT_NOFILE, &rl);
    nconns_max = (int)rl.rlim_cur;
    conns = calloc(nconns_max, sizeof *conns);

    int lfd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    int one = 1;
    setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons(port)};
    sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (bind(lfd, (struct sockaddr *)&sa, sizeof sa) < 0 || listen(lfd, 1024) < 0) {
        perror("ceiling_server: listen");
        return 1;
    }
    socklen_t len = sizeof sa;
    getsockname(lfd, (struct sockaddr *)&sa, &len);
    printf("listening on 127.0.0.1:%d\n", ntohs(sa.sin_port));
    fflush(stdout);

    ep = epoll_create1(0);
    struct epoll_event ev = {.events = EPOLLIN, .data.fd = lfd};
    epoll_ctl(ep, EPOLL_CTL_ADD, lfd, &ev);
    struct epoll_event evs[1024];
    for (;;) {
        int n = epoll_wait(ep, evs, 1024, -1);
        for (int i = 0; i < n; i++) {
            int fd = evs[i].data.fd;
            if (fd == lfd) {
                for (;;) {
                    int cfd = accept4(lfd, NULL, NULL, SOCK_NONBLOCK);
                    if (cfd < 0) break;
                    if (cfd >= nconns_max) { close(cfd); continue; }
                    setsockopt(cfd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
                    conns[cfd] = calloc(1, sizeof(conn));
                    struct epoll_event cev = {.events = EPOLLIN, .data.fd = cfd};
                    epoll_ctl(ep, EPOLL_CTL_ADD, cfd, &cev);
                }
                continue;
            }
            conn *c = conns[fd];
            if (!c) continue;
            int failed;
            if (c->out) failed = (evs[i].events & (EPOLLOUT | EPOLLERR | EPOLLHUP))
                                 ? flush_out(fd, c) : 0;
            else failed = readable(fd, c);
            if (failed) drop(fd);
        }
    }
}
