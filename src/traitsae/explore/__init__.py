"""`python explore.py`: a local Streamlit app over a store, an SAE and its sparse codes.

session.py (what one launch reads, checked up front), data.py (codes in memory, cached indexes),
draw.py (overlays, charts), app.py (the Streamlit script), views/ (one module per page),
launch.py (the entry point's function: prepare, then serve).
"""
