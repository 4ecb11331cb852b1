"""respmotion.synthesis"""
