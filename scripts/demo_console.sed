# The lines of a demo step's log shown on the console (sed -nE): cromss's own progress
# lines (written by the Ray workers, found behind Ray's "(RayTrainWorker pid=...)" prefix)
# and the summary lines the cromss commands print. Every other line stays in the log.
s/\x1b\[[0-9;]*m//g
s/^.*(\[cromss [a-z]+\] )/  \1/p
/^(MLflow run|registered model|best trial|test\/)/s/^/  /p
