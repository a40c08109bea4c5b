import glob, statistics as st, sys
rows=[]
for p in glob.glob("/tmp/stages-*.log"):
    for line in open(p):
        ts,tw,tc,tp,tr,tpl,td,n,g,te,tx,ws=line.split()
        rows.append(dict(ts=float(ts),te=float(te),tx=float(tx),tw=float(tw),tc=float(tc),tp=float(tp),tr=float(tr),tpl=float(tpl),td=float(td),n=int(n),g=int(g),ws=int(ws)))
def pct(v,q):
    v=sorted(v); return v[int(q*(len(v)-1))]*1000
steps=[("ts","te","request->send_to"),("te","tx","send_to->SQL done"),("tx","tw","SQL->event built"),("tw","tc","commit"),("tc","tp","->publish"),("tp","tr","publish->listener"),("tr","tpl","plan"),("tpl","td","emit"),("ts","td","TOTAL")]
for grp in (0,1):
  for ws in (0,1):
    R=[r for r in rows if r['g']==grp and r['n']>0 and r['ws']==ws]
    print("group" if grp else "1:1", "ws" if ws else "http", len(R))
    for a,b,name in steps:
        v=[r[b]-r[a] for r in R]
        print(f"  {name:22s} p50 {pct(v,.5):6.2f}  p90 {pct(v,.9):6.2f}  p99 {pct(v,.99):7.2f}")
