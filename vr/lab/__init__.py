"""The lab harness: routers, guests and peers in network namespaces, for tests, demos and benches."""
