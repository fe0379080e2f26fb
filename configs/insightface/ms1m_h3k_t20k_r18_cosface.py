from .leap_face_base import face_config

config = face_config("h3k_t20k", "cosface", leap=False)
