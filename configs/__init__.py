"""YAML configs shipped inside the package (`sweep start` with no --config runs demo.yaml)."""
