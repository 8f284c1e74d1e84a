"""The custom resources' API: typed models per version (`v1alpha1`), from which the CRDs are
generated (`make crds`) and with which the operator parses bodies into core values."""
