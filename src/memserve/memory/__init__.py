"""Devices, estimates and the planner: pure where it can be; never imports pool, gateway or cli."""
