"""Video style transfer with temporal consistency (Ruder, Dosovitskiy & Brox 2016): `style.py video`.

io.py reads and writes clips (PyAV), flow.py gives optical flow, warps and reliability masks (OpenCV), run.py
stylizes a clip frame by frame into a resumable work folder, cli.py is the command.
"""
