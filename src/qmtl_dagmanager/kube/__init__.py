"""The Kubernetes driver: API models of the custom resources, their CRDs, the kopf operator."""
