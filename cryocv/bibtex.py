"""
@article{Punjani2017,
title = "cryoSPARC: algorithms for rapid unsupervised cryo-EM structure determination",
journal = "Nature Methods",
volume = "14",
pages = "290--296",
year = "2017",
doi = "http://dx.doi.org/10.1038/nmeth.4169",
author = "Punjani, Ali and Rubinstein, John L. and Fleet, David J. and Brubaker, Marcus A."
}

@article{Punjani2020,
title = "Non-uniform refinement: adaptive regularization improves single-particle cryo-EM reconstruction",
journal = "Nature Methods",
volume = "17",
pages = "1214--1221",
year = "2020",
doi = "http://dx.doi.org/10.1038/s41592-020-00990-8",
author = "Punjani, Ali and Zhang, Haowei and Fleet, David J."
}

@article{Scheres2012,
title = "Prevention of overfitting in cryo-EM structure determination",
journal = "Nature Methods",
volume = "9",
pages = "853--854",
year = "2012",
doi = "http://dx.doi.org/10.1038/nmeth.2115",
author = "Scheres, Sjors H. W. and Chen, Shaoxia"
}

@article{Chen2013,
title = "High-resolution noise substitution to measure overfitting and validate resolution in 3D structure determination by single particle electron cryomicroscopy",
journal = "Ultramicroscopy",
volume = "135",
pages = "24--35",
year = "2013",
doi = "http://dx.doi.org/10.1016/j.ultramic.2013.06.004",
author = "Chen, Shaoxia and McMullan, Greg and Faruqi, Abdul R. and Murshudov, Garib N. and Short, Judith M. and Scheres, Sjors H. W. and Henderson, Richard"
}
"""
