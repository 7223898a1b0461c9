"""pytest plugin (fixtures) for mpxd handler tests."""
