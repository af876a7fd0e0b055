"""Scenario suites: the service as a whole under faults, hostile input, shutdown, several
replicas and a load balancer. Module tests (one per service/ module) are one level up."""
