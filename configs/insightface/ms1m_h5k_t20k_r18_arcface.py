from .leap_face_base import face_config

config = face_config("h5k_t20k", "arcface", leap=False)
