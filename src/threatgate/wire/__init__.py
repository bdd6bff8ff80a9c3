"""threatgate.wire"""
