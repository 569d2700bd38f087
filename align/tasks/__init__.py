"""Tasks with verifiable rewards, used by the demo and the example configs."""
