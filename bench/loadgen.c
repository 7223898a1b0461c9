/* loadgen: closed-loop load for line-based request/response TCP servers.
 *
 *   loadgen [-c CONNS] [-d DEPTH] [-t SECONDS] [-m LINE] [-k] [-P PID]... HOST PORT
 *
 *   -c CONNS    concurrent connections (default 50)
 *   -d DEPTH    request lines sent per round trip on each connection (default 1)
 *   -t SECONDS  length of the measured window (default 5)
 *   -m LINE     request line without its LF (default "1"; with "1" every
 *               answer is checked against the counter's expected value)
 *   -k          churn: each connection connects, sends DEPTH lines, reads the
 *               answers and closes (with RST, so no TIME_WAIT piles up), then
 *               starts over; measures connections per second
 *   -P PID      also report the CPU time (utime + stime from /proc/PID/stat)
 *               that PID used during the measured window; repeatable, summed
 *
 * Closed loop: a connection starts its next round only when every answer of
 * the previous one arrived, so the server's speed sets the pace.  Outside
 * churn mode, all connections are opened first (at most OPEN_WINDOW
 * handshakes at a time, each finishing one unmeasured round) and the window
 * starts once all are up; so opening 10,000 connections is not measured.
 *
 * Prints one line:
 *   reqs=N rps=R conns=C depth=D errors=E bad=B p50_us=.. p99_us=.. max_us=..
 *   connects=K secs=S loadgen_cpu=F server_cpu_s=X server_sys_s=Y
 *   loadgen_waited=W server_waited=V
 * Latency is per round trip (first byte sent to last answer read);
 * loadgen_cpu is this program's own CPU time over the window divided by the
 * window (1.0 = one core saturated: the load generator is the bottleneck);
 * the *_waited figures are the share of the window this program and the -P
 * processes spent ready to run but waiting for their core (from
 * /proc/PID/schedstat): other work on the machine.  server_cpu_s is the -P
 * processes' user + system time over the window, server_sys_s its system
 * (kernel) part; they and server_waited are -1 without -P.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define OPEN_WINDOW 256        /* handshakes in flight while opening connections */
#define SETUP_LIMIT 60.0       /* seconds allowed for opening every connection */
#define MAX_PIDS 16

enum state { CLOSED, CONNECTING, BUSY, READY };

typedef struct {
    int fd;
    enum state state;
    int pending;               /* answers still expected in this round */
    int sent;                  /* bytes of this round's requests written */
    int want_out;              /* registered for EPOLLOUT */
    long expect;               /* the counter value the next answer must carry */
    long value;                /* the answer being read, digit by digit */
    int malformed;             /* the answer being read is not a number */
    double t0;                 /* when this round started */
} conn;

static struct sockaddr_storage addr;
static socklen_t addrlen;
static char *reqbuf;
static int reqlen, depth = 1, churn = 0, verify = 1, ep;
static int measuring = 0;
static long long reqs = 0, errors = 0, bad = 0, connects = 0;
static float *lat;
static long nlat = 0, caplat = 0;
static int pids[MAX_PIDS], npids = 0;

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static double own_cpu(void) {
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return ru.ru_utime.tv_sec + ru.ru_utime.tv_usec / 1e6
         + ru.ru_stime.tv_sec + ru.ru_stime.tv_usec / 1e6;
}

/* utime + stime of every -P process, in seconds, and in *sys the stime
 * part; -1 when none was given. */
static double server_cpu(double *sys) {
    *sys = -1;
    if (npids == 0) return -1;
    long ticks = 0, sys_ticks = 0;
    for (int i = 0; i < npids; i++) {
        char path[64], buf[1024];
        snprintf(path, sizeof path, "/proc/%d/stat", pids[i]);
        FILE *f = fopen(path, "r");
        if (!f) continue;
        size_t n = fread(buf, 1, sizeof buf - 1, f);
        fclose(f);
        buf[n] = 0;
        char *p = strrchr(buf, ')');    /* the command name may hold spaces */
        if (!p) continue;
        long utime = 0, stime = 0;
        /* after ") ": state ppid pgrp session tty tpgid flags minflt cminflt
         * majflt cmajflt utime stime */
        if (sscanf(p + 2, "%*c %*d %*d %*d %*d %*d %*u %*u %*u %*u %*u %ld %ld",
                   &utime, &stime) == 2) {
            ticks += utime + stime;
            sys_ticks += stime;
        }
    }
    *sys = (double)sys_ticks / sysconf(_SC_CLK_TCK);
    return (double)ticks / sysconf(_SC_CLK_TCK);
}

/* Seconds the given process (its main thread) waited on a run queue, ready
 * to run but not running: time another process had its core. */
static double run_delay(int pid) {
    char path[64];
    snprintf(path, sizeof path, pid ? "/proc/%d/schedstat" : "/proc/self/schedstat", pid);
    FILE *f = fopen(path, "r");
    if (!f) return 0;
    unsigned long long on_cpu = 0, waited = 0;
    int n = fscanf(f, "%llu %llu", &on_cpu, &waited);
    fclose(f);
    return n == 2 ? waited / 1e9 : 0;
}

static double servers_run_delay(void) {
    double total = 0;
    for (int i = 0; i < npids; i++) total += run_delay(pids[i]);
    return total;
}

static void record(double us) {
    if (nlat == caplat) {
        caplat = caplat ? caplat * 2 : 1 << 16;
        lat = realloc(lat, caplat * sizeof *lat);
        if (!lat) { perror("realloc"); exit(1); }
    }
    lat[nlat++] = (float)us;
}

static int cmpf(const void *a, const void *b) {
    float x = *(const float *)a, y = *(const float *)b;
    return (x > y) - (x < y);
}

static void set_events(conn *c, int want_out) {
    struct epoll_event ev = {.events = EPOLLIN | (want_out ? EPOLLOUT : 0), .data.ptr = c};
    epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &ev);
    c->want_out = want_out;
}

/* Start a connection; it becomes BUSY (sends its first round) once connected. */
static void open_conn(conn *c) {
    c->fd = socket(addr.ss_family, SOCK_STREAM | SOCK_NONBLOCK, 0);
    if (c->fd < 0) { perror("socket"); exit(1); }
    int one = 1;
    setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    c->state = CONNECTING;
    c->expect = 1;
    c->value = 0;
    c->malformed = 0;
    c->t0 = now();
    if (connect(c->fd, (struct sockaddr *)&addr, addrlen) < 0 && errno != EINPROGRESS) {
        errors++;
        close(c->fd);
        c->fd = -1;
        c->state = CLOSED;
        return;
    }
    struct epoll_event ev = {.events = EPOLLIN | EPOLLOUT, .data.ptr = c};
    epoll_ctl(ep, EPOLL_CTL_ADD, c->fd, &ev);
    c->want_out = 1;
}

static void close_conn(conn *c, int reset) {
    if (reset) {
        struct linger lg = {1, 0};
        setsockopt(c->fd, SOL_SOCKET, SO_LINGER, &lg, sizeof lg);
    }
    close(c->fd);           /* also leaves the epoll set */
    c->fd = -1;
    c->state = CLOSED;
}

/* Write what is left of this round's requests; poll for output if the kernel
 * took only part of it. Returns -1 when the connection broke. */
static int push(conn *c) {
    while (c->sent < reqlen) {
        ssize_t w = write(c->fd, reqbuf + c->sent, reqlen - c->sent);
        if (w < 0) {
            if (errno == EAGAIN || errno == EINTR) break;
            return -1;
        }
        c->sent += w;
    }
    int want_out = c->sent < reqlen;
    if (want_out != c->want_out) set_events(c, want_out);
    return 0;
}

static int start_round(conn *c) {
    c->state = BUSY;
    c->pending = depth;
    c->sent = 0;
    if (!churn) c->t0 = now();      /* churn rounds count from connect() */
    return push(c);
}

/* Count the answers in buf; returns 1 when the round is complete. */
static int take_answers(conn *c, const char *buf, ssize_t n) {
    for (ssize_t i = 0; i < n; i++) {
        char ch = buf[i];
        if (ch == '\n') {
            if (verify && (c->malformed || c->value != c->expect)) bad++;
            c->expect++;
            c->value = 0;
            c->malformed = 0;
            c->pending--;
            if (measuring) reqs++;
        } else if (ch >= '0' && ch <= '9') {
            c->value = c->value * 10 + (ch - '0');
        } else if (ch != '\r') {
            c->malformed = 1;
        }
    }
    return c->pending <= 0;
}

static void usage(void) {
    fprintf(stderr, "usage: loadgen [-c conns] [-d depth] [-t seconds] [-m line] [-k] "
                    "[-P pid]... host port\n");
    exit(2);
}

int main(int argc, char **argv) {
    int nconns = 50, opt;
    double secs = 5;
    const char *msg = "1";
    while ((opt = getopt(argc, argv, "c:d:t:m:kP:h")) != -1) {
        switch (opt) {
        case 'c': nconns = atoi(optarg); break;
        case 'd': depth = atoi(optarg); break;
        case 't': secs = atof(optarg); break;
        case 'm': msg = optarg; verify = strcmp(msg, "1") == 0; break;
        case 'k': churn = 1; break;
        case 'P':
            if (npids == MAX_PIDS) usage();
            pids[npids++] = atoi(optarg);
            break;
        default: usage();
        }
    }
    if (argc - optind != 2 || nconns < 1 || depth < 1 || secs <= 0) usage();
    signal(SIGPIPE, SIG_IGN);

    struct rlimit rl;
    getrlimit(RLIMIT_NOFILE, &rl);
    rl.rlim_cur = rl.rlim_max;
    setrlimit(RLIMIT_NOFILE, &rl);
    if ((rlim_t)nconns + 16 > rl.rlim_cur) {
        fprintf(stderr, "loadgen: %d connections need more file descriptors than the "
                        "limit of %ld\n", nconns, (long)rl.rlim_cur);
        return 1;
    }

    struct addrinfo hints = {.ai_socktype = SOCK_STREAM}, *ai;
    if (getaddrinfo(argv[optind], argv[optind + 1], &hints, &ai) != 0) {
        fprintf(stderr, "loadgen: bad address %s %s\n", argv[optind], argv[optind + 1]);
        return 2;
    }
    memcpy(&addr, ai->ai_addr, ai->ai_addrlen);
    addrlen = ai->ai_addrlen;
    freeaddrinfo(ai);

    int msglen = strlen(msg);
    reqlen = (msglen + 1) * depth;
    reqbuf = malloc(reqlen);
    for (int i = 0; i < depth; i++) {
        memcpy(reqbuf + i * (msglen + 1), msg, msglen);
        reqbuf[i * (msglen + 1) + msglen] = '\n';
    }

    ep = epoll_create1(0);
    conn *cs = calloc(nconns, sizeof *cs);
    for (int i = 0; i < nconns; i++) { cs[i].fd = -1; cs[i].state = CLOSED; }
    int opened = 0, ready = 0, in_flight = 0;

    double t_start = 0, t_end = 0, cpu0 = 0, server0 = 0, sys0 = 0, wait0 = 0, server_wait0 = 0;
    double setup_deadline = now() + SETUP_LIMIT;
    if (churn) {
        measuring = 1;
        t_start = now(); t_end = t_start + secs;
        cpu0 = own_cpu(); server0 = server_cpu(&sys0);
        wait0 = run_delay(0); server_wait0 = servers_run_delay();
        for (int i = 0; i < nconns; i++) open_conn(&cs[i]);
    }

    static char buf[1 << 16];
    struct epoll_event evs[1024];
    for (;;) {
        double t = now();
        if (measuring && t >= t_end) break;
        if (!measuring) {
            if (t > setup_deadline) {
                fprintf(stderr, "loadgen: only %d of %d connections up after %.0fs\n",
                        ready, nconns, SETUP_LIMIT);
                return 1;
            }
            while (opened < nconns && in_flight < OPEN_WINDOW) {
                open_conn(&cs[opened++]);
                in_flight++;
            }
            if (ready == nconns) {
                measuring = 1;
                t_start = now(); t_end = t_start + secs;
                cpu0 = own_cpu(); server0 = server_cpu(&sys0);
                wait0 = run_delay(0); server_wait0 = servers_run_delay();
                for (int i = 0; i < nconns; i++)
                    if (cs[i].state == READY && start_round(&cs[i]) < 0) {
                        errors++; close_conn(&cs[i], 0); open_conn(&cs[i]);
                    }
                continue;
            }
        }
        int timeout = measuring ? (int)((t_end - t) * 1000) + 1 : 100;
        if (timeout > 100) timeout = 100;
        int n = epoll_wait(ep, evs, 1024, timeout);
        for (int i = 0; i < n; i++) {
            conn *c = evs[i].data.ptr;
            uint32_t e = evs[i].events;
            if (c->fd < 0) continue;
            if (c->state == CONNECTING) {
                int err = 0;
                socklen_t len = sizeof err;
                getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &len);
                if (err || (e & (EPOLLERR | EPOLLHUP))) goto broken;
                if (!(e & EPOLLOUT)) continue;
                if (measuring) connects++;
                if (start_round(c) < 0) goto broken;
                continue;
            }
            if ((e & EPOLLOUT) && c->state == BUSY && push(c) < 0) goto broken;
            if (e & (EPOLLIN | EPOLLHUP | EPOLLERR)) {
                ssize_t r = read(c->fd, buf, sizeof buf);
                if (r < 0 && (errno == EAGAIN || errno == EINTR)) continue;
                if (r <= 0 || c->state != BUSY) goto broken;
                if (!take_answers(c, buf, r)) continue;
                if (!measuring) {           /* the unmeasured first round */
                    c->state = READY;
                    ready++;
                    in_flight--;
                } else {
                    record((now() - c->t0) * 1e6);
                    if (churn) {
                        close_conn(c, 1);
                        open_conn(c);
                    } else if (start_round(c) < 0) {
                        goto broken;
                    }
                }
            }
            continue;
        broken:
            errors++;
            if (!measuring && errors > 2LL * nconns + 100) {
                fprintf(stderr, "loadgen: too many failed connections while opening them\n");
                return 1;
            }
            if (!measuring && c->state == READY) { ready--; in_flight++; }
            close_conn(c, 0);
            open_conn(c);
        }
    }
    double elapsed = now() - t_start;
    double cpu = (own_cpu() - cpu0) / elapsed;
    double sys1;
    double server = npids ? server_cpu(&sys1) - server0 : -1;
    double server_sys = npids ? sys1 - sys0 : -1;
    double waited = (run_delay(0) - wait0) / elapsed;
    double server_waited = npids ? (servers_run_delay() - server_wait0) / elapsed : -1;

    qsort(lat, nlat, sizeof *lat, cmpf);
    double p50 = nlat ? lat[nlat / 2] : 0;
    double p99 = nlat ? lat[(long)(nlat * 0.99)] : 0;
    double mx = nlat ? lat[nlat - 1] : 0;
    printf("reqs=%lld rps=%.0f conns=%d depth=%d errors=%lld bad=%lld p50_us=%.0f "
           "p99_us=%.0f max_us=%.0f connects=%lld secs=%.3f loadgen_cpu=%.3f "
           "server_cpu_s=%.3f server_sys_s=%.3f loadgen_waited=%.3f server_waited=%.3f\n",
           reqs, reqs / elapsed, nconns, depth, errors, bad, p50, p99, mx, connects,
           elapsed, cpu, server, server_sys, waited, server_waited);
    return 0;
}
