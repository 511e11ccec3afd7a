"""HTTP dialects: each a pair of pure converters around the core types."""
