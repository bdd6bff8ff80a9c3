"""threatgate.lb"""
