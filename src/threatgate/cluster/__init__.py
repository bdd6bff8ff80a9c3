"""threatgate.cluster"""
