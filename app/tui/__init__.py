"""The Textual chat app behind `ripe chat`: one file per widget, the stylesheet in ripe.tcss."""
