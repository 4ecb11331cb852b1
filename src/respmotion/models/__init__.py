"""respmotion.models"""
