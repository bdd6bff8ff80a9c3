"""threatgate.net"""
