"""Adapters: real implementations of the ports (Neo4j, Kafka, a directory) and in-memory twins."""
