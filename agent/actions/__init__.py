"""Built-in pipeline actions; `registry` maps their names to lazy imports."""
