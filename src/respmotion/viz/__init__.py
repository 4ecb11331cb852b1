"""respmotion.viz"""
