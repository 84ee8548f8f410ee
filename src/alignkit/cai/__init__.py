"""Constitutional AI (Bai et al. 2022): the constitution of principles, the critique -> revision loop of
the supervised phase (`alignkit cai-revise`) and the AI-feedback judge of the RL phase (`alignkit cai-label`,
and build-prefs' reward=judge).
"""
