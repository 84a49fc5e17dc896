"""The production stack behind the storage ports: RabbitMQ (queue), Redis (offline inboxes,
positions, groups, dedup) and HBase (history)."""
