"""Generated from proto/tokenvault/v1/tokenvault.proto by generate.py; do not edit."""
