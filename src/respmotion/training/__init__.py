"""respmotion.training"""
