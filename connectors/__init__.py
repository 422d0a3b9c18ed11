"""The I/O edges: Kafka clients and the transactional step, topic administration, object storage, the retry policy.
They carry records and bytes; they do not decide."""
