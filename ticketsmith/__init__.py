"""TicketSmith: how far can a network be pruned before quality drops, and what does it save?"""

__version__ = "0.1.0"
