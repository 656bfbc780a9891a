"""End-to-end tests: a package, so the services its conftest shares (package scope) stop after its last test."""
