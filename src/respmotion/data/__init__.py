"""respmotion.data"""
