"""Avro contracts (.avsc under avro/) and the serde that reads and writes them."""
