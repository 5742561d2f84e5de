"""What is saved: the run's state (its checks and versioned migrations), bit-packed masks, the sparse export."""
