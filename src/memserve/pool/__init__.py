"""The model pool: the one owner of runners, with its pure eviction policy and memory ledger."""
