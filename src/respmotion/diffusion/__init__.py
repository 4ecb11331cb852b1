"""respmotion.diffusion"""
