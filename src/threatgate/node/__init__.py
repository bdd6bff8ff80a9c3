"""threatgate.node"""
