# Prints nothing. Writes its history as CSV and a checkpoint into the working directory.
import argparse
import csv
import pickle

p = argparse.ArgumentParser()
p.add_argument("--lr", type=float, default=0.01)
p.add_argument("--epochs", type=int, default=4)
a = p.parse_args()
with open("history.csv", "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["epoch", "train_loss", "val_loss"])
    for epoch in range(a.epochs):
        loss = abs(a.lr - 0.03) * 10 + 1.0 / (epoch + 1)
        w.writerow([epoch, round(loss, 6), round(loss * 1.2, 6)])
with open("model.pkl", "wb") as f:
    pickle.dump({"lr": a.lr}, f)
