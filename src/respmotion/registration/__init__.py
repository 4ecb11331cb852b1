"""respmotion.registration"""
