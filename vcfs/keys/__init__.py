"""Key providers: everything that wraps or unwraps a DEK lives behind keys.base.KeyProvider."""
