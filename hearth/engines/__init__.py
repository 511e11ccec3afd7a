"""Everything that produces tokens or vectors, behind `hearth.core.engine.Engine`."""
