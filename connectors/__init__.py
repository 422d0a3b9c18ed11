"""The I/O edges: Kafka, object storage, Redis, HTTP. They carry records and bytes; they do not decide."""
