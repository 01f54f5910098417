"""CPU expert backends behind one interface (`backend.py`), chosen by the profile's options and
proven by a self-check on this CPU before they serve (`choice.py`)."""
