"""Study results: the statistics over seeds (stats), the report built from the runs' metrics (report) and
its Markdown and plots (render). Pure functions of the runs' params and metrics, so a report can be
rebuilt without rerunning; running the arms is flows.study's job.
"""
