"""threatgate.config"""
