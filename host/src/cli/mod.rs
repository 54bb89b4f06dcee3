//! Reading `aemp`'s command line: options ([`args`]) and the reference's verbs ([`verbs`]).

pub mod args;
pub mod show;
pub mod verbs;

/// `aemp --help`.
pub const USAGE: &str = "\
Usage: aemp [OPTIONS] VERB [ARGS]... [VERB [ARGS]...]...

Verbs chain: each takes the arguments it needs and the next one follows.

Protocol (a bare node id is that node's node port):
  snd PORT ARGS...          send a message, then confirm its delivery
  cal PORT ARGS...          append a reply port, print the reply's values
  mon PORT                  print the reason when the port dies
  eval NODE EXPR...         ask a node to evaluate EXPR (aemp nodes refuse)
  restart NODE              ask a node under a watchdog to restart (an eval)
  shell [NODE]              interactive evals on NODE (=: nodes, =NODE: switch)
  trace NODE                list the nodes connected to NODE, then to those...
  info NODE                 what an aemp node is doing: connections, ports, counters
  dataconn NODE HANDLER ARGS...   a data connection to NODE's handler: stdin to it,
                            what it sends to stdout (`run --echo` offers `echo`)
  run [PROFILE] [KEY VALUE]...   run a node until interrupted
  dbfamily|dbkeys|dbvalues FAMILY   read the network database (needs seeds)

Configuration (edits the top level, or the profile chosen by `profile`/--profile):
  setnodeid ID | delnodeid
  gensecret | setsecret SECRET | delsecret
  gencert | setcert FILE | delcert
  setseeds A,B... | delseeds | addseed A | delseed A
  setbinds A,B... | delbinds | addbind A | delbind A
  setservices A,B... | delservices | addservice S | delservice S
  seteval STRING | deleval          (edited only: aemp runs no Perl code)
  profile NAME | setparent NAME | delparent | delprofile NAME
  showprofile NAME | showconfig [NAME [KEY VALUE]...]
  set/del: monitor_timeout connect_interval framing_format auth_offer auth_accept
           autocork nodelay secure node_info (false: refuse `info` requests)
  Every setX is also X; seeds/binds take any number of addresses.

Arguments: a lone argument starting with `[` is a JSON array replacing all arguments;
otherwise arguments starting with `[`, `{` or `\"` are JSON, all others plain strings.

Options (anywhere; `--` ends them):
  --profile NAME       profile to use (default: the host name; protocol verbs: aemp)
  --connect HOST:PORT  reach a node directly, without seeds (repeatable)
  --secret S           shared secret
  --cert FILE          PEM file with certificate, key and CA certificate (TLS)
  --framing json|cbor  framing to ask for
  --listen HOST:PORT   listen there (repeatable; replaces the configured binds)
  --nodeid ID          node id (%n, %u and a trailing / are expanded)
  --timeout SECONDS    wait this long for connections and replies (default 10)
  --max-memory MIB     the node's sandbox memory limit (default 256)
  --echo               run: add port `echo` and data handler `echo`
  --metrics HOST:PORT  run: serve Prometheus metrics over HTTP there
  --json               snd, cal, mon, eval: print a JSON array; info: the raw JSON
  -v, -vv              more log output on stderr
  -h, --help | -V, --version
";
