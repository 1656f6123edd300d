"""Katydid's worker side: the whisper.cpp engine, the model pipeline and (later) the job consumer."""
