"""abuse.ch CSV feeds laid out exactly as abuse.ch publishes them (values made up, documentation addresses).

URLhaus (``https://urlhaus.abuse.ch/downloads/csv/``, ``csv_recent/``): a banner of ``#`` lines whose
last line is the header itself (``# id,dateadded,...``), then one fully quoted row per URL; ``tags``
holds commas inside its quotes, ``last_online`` may be empty.  Feodo Tracker
(``https://feodotracker.abuse.ch/downloads/ipblocklist.csv``): a banner, then an uncommented quoted
header with the address in ``dst_ip``, quoted rows and a ``# END n entries`` trailer.  Some copies and
mirrors comment that header too (``# first_seen_utc,dst_ip,...``): ``FEODO_COMMENTED_HEADER``.
"""

from __future__ import annotations

URLHAUS = '''\
################################################################
# abuse.ch URLhaus Database Dump (CSV - recent URLs only)      #
# Last updated: 2026-05-27 11:52:06 (UTC)                      #
#                                                              #
# Terms Of Use: https://urlhaus.abuse.ch/api/                  #
# For questions please contact urlhaus [at] abuse.ch           #
################################################################
#
# id,dateadded,url,url_status,last_online,threat,tags,urlhaus_link,reporter
"3853890","2026-05-27 11:52:06","http://198.51.100.23:57501/bin.sh","online","2026-05-27 11:52:06",\
"malware_download","32-bit,elf,mips,Mozi","https://urlhaus.abuse.ch/url/3853890/","geenensp"
"3853889","2026-05-27 11:51:06","https://reoen.webgondozas.example/a44f43f1-dc49-4a45-b725-33106ce13f94?ublib=7",\
"offline","","malware_download","ClearFake","https://urlhaus.abuse.ch/url/3853889/","anonymous"
"3853888","2026-05-27 11:49:40","http://Pagos-Banc0.example","online","2026-05-27 11:49:40","malware_download",\
"exe","https://urlhaus.abuse.ch/url/3853888/","Jürgen_Müller"
"3853887","2026-05-27 11:48:02","http://files.example-host.test/dl/invoice/","online","2026-05-27 11:48:02",\
"malware_download","None","https://urlhaus.abuse.ch/url/3853887/","abuse_ch"
"3853886","2026-05-27 11:47:55","http://203.0.113.80/x.php?a=1,2&b=""q""","offline","","malware_download",\
"php,webshell","https://urlhaus.abuse.ch/url/3853886/","anonymous"
'''

URLHAUS_HEADER = ["id", "dateadded", "url", "url_status", "last_online", "threat", "tags", "urlhaus_link", "reporter"]
URLHAUS_HEADER_LINE = 9

FEODO = """\
################################################################
# abuse.ch Feodo Tracker Botnet C2 IP Blocklist (CSV)          #
# Last updated: 2026-05-27 12:04:12 UTC                        #
#                                                              #
# Terms Of Use: https://feodotracker.abuse.ch/blocklist/       #
# For questions please contact feodotracker [at] abuse.ch      #
################################################################
#
"first_seen_utc","dst_ip","dst_port","c2_status","last_online","malware"
"2022-06-04 21:24:53","192.0.2.146","8080","offline","2026-05-20","Emotet"
"2025-12-30 13:56:31","203.0.113.211","443","online","2026-05-27","QakBot"
"2026-01-13 21:41:15","198.51.100.63","2222","online","2026-05-27","Pikabot"
# END 3 entries
"""

FEODO_COMMENTED_HEADER = FEODO.replace(
    '"first_seen_utc","dst_ip","dst_port","c2_status","last_online","malware"',
    "# first_seen_utc,dst_ip,dst_port,c2_status,last_online,malware",
)
FEODO_HEADER = ["first_seen_utc", "dst_ip", "dst_port", "c2_status", "last_online", "malware"]
FEODO_HEADER_LINE = 9
