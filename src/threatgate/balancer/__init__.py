"""threatgate.balancer"""
