"""What quantcal keeps on disk: verified cache entries that heal when damaged (``cache``), file
digests memoised by size and mtime (``digest``), and the ownership of an output folder
(``runfolder``). The bottom layer: the study, QAT's resumable work folder, the dataset digests
and the report all read and write through it, and it imports nothing of theirs."""
