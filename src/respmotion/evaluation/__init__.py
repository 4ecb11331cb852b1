"""respmotion.evaluation"""
