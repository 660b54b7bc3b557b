"""audit/mia"""
