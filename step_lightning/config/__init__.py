"""Between the composed Hydra config and the library: resolvers, up-front checks, the model adapter."""
